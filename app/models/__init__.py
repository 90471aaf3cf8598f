"""The models resource: students produced by jobs (and, later, uploaded teachers)."""
