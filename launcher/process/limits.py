"""The n_ctx bounds and the RPC worker's default port, defined once here with no imports: a front end's
argument parser shows and checks them (`chorus serve --n-ctx`, `chorus worker --port`, through
orchestrator/limits.py) without loading the process machinery. server.py and rpc.py re-export them."""

MIN_N_CTX = 64          # per slot: the smallest context anything may ask for (models.yaml, --set, --n-ctx, the UI)
MAX_N_CTX = 4_194_304   # the largest (config/schema.py's bounds are these two)
RPC_DEFAULT_PORT = 50052  # rpc-server's own default
