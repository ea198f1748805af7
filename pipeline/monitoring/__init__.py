"""What the served model meets in live traffic: drift against the training reference and the label-free
accuracy estimate (`drift`), what the shadow challenger did (`shadow_report`) and `tollgate monitor`'s
report (`report`). The shards they read are `pipeline.data.shards`."""
