"""HTTP edge: request parsing, responses, errors and the route handlers."""
