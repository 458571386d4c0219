"""Deployment: hugepage setup, systemd unit, example configs and the network namespace lab."""
