"""Judging a candidate: test-split metrics (`metrics`), the @champion re-scored on the same data
(`champion`), the gate with every check, the online one included (`gate`), and the verdict it hands on
(`verdict`)."""
