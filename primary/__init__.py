"""The primary process: creates the shared memory, the ports and the tables, serves IPC."""
