"""What operators run: the `airlock` CLI, the launcher and supervisor, the development PKI and tokens."""
