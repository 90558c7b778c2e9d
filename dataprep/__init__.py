"""dataprep: shards image corpora into webdataset tar shards on any fsspec store (issue 3)."""
