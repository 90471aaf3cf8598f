"""API keys and tenants: keys are stored hashed, shown once, revocable; every request acts as one tenant."""
