"""Server code the gateway and the worker share (never imported by the SDK): the gRPC server
factory and its interceptor, structured logs, stream merging, signed bundles."""
