"""HTTP in both directions: the Trio+h11 server (:mod:`.server`), the route table and
its typed inputs (:mod:`.routes`, :mod:`.inputs`), response and error bodies
(:mod:`.responses`, :mod:`.errors`), per-origin gates (:mod:`.limits`), the OpenAPI
document built from the routes (:mod:`.openapi`) and the outbound peer client
(:mod:`.client`)."""
