"""``embedbatch report``: one self-contained HTML page (runs, batches, datasets, local runs),
written to a file or served live by ``poll --watch --ui-port`` and ``serve --ui``."""
