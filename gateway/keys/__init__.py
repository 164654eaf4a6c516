"""Tenant data keys: the keystore and its backends (file, PKCS#11 HSM)."""
