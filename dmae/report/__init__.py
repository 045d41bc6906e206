"""Reports: certified-accuracy summaries, the attack section, figures, published numbers, and one document model
rendered as Markdown and self-contained HTML.

May import every other package of dmae (it reads what they produce); nothing imports it.
"""
