"""Database access: engine, tables and repositories. Every SQL statement of the service lives in this package."""
