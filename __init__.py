"""hotplane: a userspace packet dataplane and zero-downtime NAT/gateway."""

__version__ = "0.1.0"
