"""The `airlock` command; each subcommand's module is imported only when it runs."""
