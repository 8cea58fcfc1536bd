"""data_prep: image folders and datasets -> WebDataset tar shards with a manifest."""
