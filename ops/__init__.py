"""ops: where and how runs happen. Imports only `diffusion.config` from the research side."""
