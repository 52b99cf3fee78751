#!/usr/bin/env bash
# Best effort: a LaTeX engine so the tests compile the rendered tables (tests/test_tables.py).
# Installs Debian's texlive base packages when running as root with apt; otherwise does nothing
# (the test then checks the tabular structure without compiling).
command -v pdflatex >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      texlive-latex-base texlive-latex-recommended >/dev/null) \
    || echo "warning: could not install pdflatex; LaTeX tables are parse-checked, not compiled" >&2
fi
exit 0
