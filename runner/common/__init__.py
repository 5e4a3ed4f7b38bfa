"""The runner's leaf helpers: the error contract (errors), complete-or-absent writes (safeio), markdown table
cells (markdown), bootstrap statistics (stats), label matching (labels), the launcher's world (dist) and the CPU
settings (cpu).

Every other package may use these; evaluators may use stats, labels, safeio and markdown.

May import: nothing of the project.
"""
