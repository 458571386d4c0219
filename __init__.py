"""hotplane: a userspace packet dataplane and zero-downtime NAT/gateway."""

import os as _os

# numpy's OpenBLAS starts a thread per core at import and lets them spin between calls.
# No hotplane process does linear algebra, and every core is a poller's: one BLAS thread.
# (Set before numpy is imported, which any hotplane module does; an explicit setting wins.)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")
del _var

__version__ = "0.1.0"
