"""SDC criteria beyond top-1/tol/cosine, usable as ``--sdc package.module:function`` hooks."""
