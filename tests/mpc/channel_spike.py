import sys, time, datetime, torch, torch.distributed as dist
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization
sys.path.insert(0, "/work/wt-channel")
from mpcfl.mpc import channel
rank, world = int(sys.argv[1]), int(sys.argv[2]); plain = len(sys.argv) > 3
names = [f"p{i}" for i in range(world)]
seed = bytes([rank + 1]) * 32
key = Ed25519PrivateKey.from_private_bytes(seed)
pubs = [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32).public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for i in range(world)]
inner = dist.FileStore(f"/tmp/tls/spike-store", world)
if not plain:
    cert = channel.certificate(key, name=names[rank], rank=rank, fingerprint="f", run_id="r")
    inner.set(f"mpcfl/cert/{rank}", cert)
    certs = {}
    for r in range(world):
        if r != rank:
            pem = bytes(inner.get(f"mpcfl/cert/{r}"))
            channel.check_certificate(pem, public_key=pubs[r], fingerprint="f", run_id="r", rank=r, who=names[r])
            certs[r] = pem
    relay = channel.Relay(rank, names, cert, key, certs, "127.0.0.1")
    store = channel.channel_store(inner, relay)
else:
    store = inner
dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
t = torch.tensor([rank + 1.0]); dist.all_reduce(t); print(rank, "allreduce", t.item(), flush=True)
g = dist.new_group(list(range(world)))
t = torch.tensor([rank + 1.0]); dist.all_reduce(t, group=g); print(rank, "subgroup allreduce", t.item(), flush=True)
x = torch.randn(1 << 22, dtype=torch.float64)  # 32 MB
dist.barrier()
start = time.perf_counter()
for _ in range(5):
    y = x.clone(); dist.all_reduce(y)
dt = time.perf_counter() - start
if rank == 0: print(f"{'plain' if plain else 'tls'}: 5 x 32 MB all_reduce {dt:.2f}s = {5*32/dt:.0f} MB/s", flush=True)
start = time.perf_counter()
small = torch.zeros(8)
for _ in range(500):
    dist.all_reduce(small)
dt = time.perf_counter() - start
if rank == 0: print(f"{'plain' if plain else 'tls'}: 500 small all_reduce {dt*1e6/500:.0f} us each", flush=True)
dist.destroy_process_group()
