"""The elastic side of nestlm. For now it holds `nestlm.elastic.artifact`: the elastic checkpoint format
(file names, manifest and router readers, budget resolution, provenance). The training modules (config,
importance, sort, router, losses, checkpoint, parallel, train) move here with the package reshape."""
