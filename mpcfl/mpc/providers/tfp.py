"""CrypTen's trusted first party: party 0 generates every triple, so it can see all secrets.

No dealer process: for tests only.
"""

from mpcfl.mpc.providers import Provider

PROVIDER = Provider(
    name="tfp",
    needs_dealer=False,
    crypten_name="TFP",
    warning="INSECURE: provider tfp is on, so party {first} generates every Beaver triple "
    "and can see all secrets. Use only for tests.",
)
