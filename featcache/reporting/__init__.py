"""The report: from run records to tables, figures, Markdown and HTML.

`build` (`featcache report`), `summary` (the rows and the report's data), `columns`,
`bootstrap` (confidence intervals), `reference` (the paper's numbers), `sections` (the
page's sections, one model), `pages` (its Markdown and HTML), `figures`, `cka`.
"""
