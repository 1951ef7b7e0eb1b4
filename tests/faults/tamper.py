"""A man in the middle on a TLS link, for the channel's tests (``tests/mpc/test_channel.py``) and for
a deviating network loaded into a job's processes (``tests/faults/sitecustomize.py``)."""

from __future__ import annotations

import socket
import threading


def records(buffer: bytearray) -> list[bytes]:
    """Whole TLS records taken off the front of ``buffer`` (5-byte header: type, version, length)."""
    out = []
    while len(buffer) >= 5 and len(buffer) >= 5 + int.from_bytes(buffer[3:5], "big"):
        size = 5 + int.from_bytes(buffer[3:5], "big")
        out.append(bytes(buffer[:size]))
        del buffer[:size]
    return out


def man_in_the_middle(host: str, target: int, attack: str | None, seen: bytearray) -> int:
    """A man in the middle on the network between a relay and its peer's listener at ``host:target``:
    a loopback listener (the port returned) that forwards TLS records both ways, doing ``attack`` to
    the application data of each direction (the records past the handshake's: at least 4 KiB): flip
    one byte of the first, drop it, replay it, swap it with the next, or cut the link halfway
    through it. ``seen`` collects the bytes the relay sent."""
    listener = socket.create_server(("127.0.0.1", 0))

    def forward(src: socket.socket, dst: socket.socket, record_into: bytearray | None) -> None:
        buffer, held, done = bytearray(), None, attack is None
        try:
            while data := src.recv(65536):
                buffer += data
                if record_into is not None:
                    record_into.extend(data)
                for record in records(buffer):
                    if done or len(record) < 4096:  # the handshake's flights are smaller
                        dst.sendall(record)
                    elif attack == "flip":
                        dst.sendall(record[:-100] + bytes([record[-100] ^ 1]) + record[-99:])
                        done = True
                    elif attack == "drop":
                        done = True
                    elif attack == "replay":
                        dst.sendall(record + record)
                        done = True
                    elif attack == "reorder" and held is None:
                        held = record
                    elif attack == "reorder":
                        dst.sendall(record + held)
                        done = True
                    elif attack == "truncate":
                        dst.sendall(record[: len(record) // 2])
                        return
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def run() -> None:
        inbound, _ = listener.accept()
        outbound = socket.create_connection((host, target))
        threading.Thread(target=forward, args=(outbound, inbound, None), daemon=True).start()
        forward(inbound, outbound, seen)

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1]
