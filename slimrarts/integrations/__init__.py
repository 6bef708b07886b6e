"""Integrations with other training frameworks, each behind its optional extra (`slimrarts.integrations.lightning`:
`pip install 'slimrarts[lightning]'`). Nothing is imported here: a missing extra fails when its module is."""
