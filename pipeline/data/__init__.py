"""Data: where images come from (`sources`), the one way a file becomes pixels (`images`), the prepared,
split arrays every later stage reads (`prepared`), and the Great Expectations suite that refuses bad data
(`expectations`)."""
