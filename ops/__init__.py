"""ops: where and how runs happen. From the research side it imports only `diffusion.config`,
`diffusion.records` (the run-dir files) and `diffusion.yamlfile`."""
