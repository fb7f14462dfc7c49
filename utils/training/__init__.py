"""Training: config, loop, step, resumable state, distributed helpers, ACL, releases."""
