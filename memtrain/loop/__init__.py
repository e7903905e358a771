"""The training loop, on Lightning: the module, callbacks and `fit`."""
