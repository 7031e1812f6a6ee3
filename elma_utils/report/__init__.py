"""REPORT.md and the README's results block, built from the metrics files.

``provenance``  where a metrics file came from (commit, dirty work tree, command)
``headline``    key results beside their targets and the anchors' numbers; the README block
``sections``    one section per notebook: a few numbers, what they mean, its figures
``document``    puts REPORT.md together (``elma_utils.reporting.write_report`` calls it)

``python -m elma_utils.report`` rewrites reports/REPORT.md and the README's results block.
"""
