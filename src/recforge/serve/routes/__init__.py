"""The HTTP routes, one module per audience: health (probes, metrics, docs), model_routes (recommend, score),
events, admin. Each route calls one method of the server's parts and maps its errors to status codes."""
