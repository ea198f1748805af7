"""Data: where images come from (`sources`), the one way a file becomes pixels (`images`), the prepared,
split arrays every later stage reads (`prepared`), the Great Expectations suite that refuses bad data
(`expectations`), and live data on disk or in a bucket: the shards servers write (`shards`) and the
feedback users label (`feedback`), which prepare turns into a new data version."""
