"""Who is calling and whether they may: identities (JWT, mTLS), the call guard, lockouts."""
