"""The dataset store: shards, manifest and id index of a (model, dataset), and their one writer."""
