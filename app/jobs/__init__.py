"""The jobs resource: schemas, service (rules), router (HTTP), dispatch (queue publishing)."""
