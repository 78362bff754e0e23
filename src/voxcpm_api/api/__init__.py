"""HTTP layer: schemas, routes, error mapping, app factory."""
