"""The command-line tools: `keras-feed-train`, `-eval`, `-export`, `-analyze`.

Each is a module here (`python -m keras_feed.cli.train`, ...) that defines its
flags when it runs, so that every command and library module can be imported
together in one process; `common` holds what they share.
"""
