"""Airlock gateway: authenticates callers and relays their requests to their own tenant's workers."""
