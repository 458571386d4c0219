"""Library code every hotplane process uses: memory, rings, tables, packets, IPC."""
