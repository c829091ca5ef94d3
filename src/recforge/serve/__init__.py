"""`recforge serve`: the online inference service (see app.py for the routes, service.py for the state)."""
