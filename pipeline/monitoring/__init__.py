"""What the served model meets in live traffic: drift against the training reference (`drift`), the
sampled shards on disk (`shards`), labelled feedback images (`feedback`), what the shadow challenger did
(`shadow_report`) and `tollgate monitor`'s report (`report`)."""
