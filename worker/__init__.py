"""Airlock worker: serves one tenant's model in one isolation domain, spoken to only by the gateway."""
