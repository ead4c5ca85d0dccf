"""MNIST data for the three models: verified offline acquisition and fast in-memory loaders."""
