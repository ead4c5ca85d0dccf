# The report and the hand-in; included by the main Makefile, which defines PY and STAMP.
#   make report                    report/report.pdf from results/ (missing numbers print as ??)
#   make submission NAME=lastname  lastname_assignment3.zip: the report with the name on its title
#                                  page, and the code
# Building the report needs pdflatex and latexmk (Debian: texlive-latex-base
# texlive-latex-recommended texlive-fonts-recommended texlive-latex-extra latexmk). Without them,
# `make submission` packs the committed report/report.pdf, which carries no name, and says so.

.PHONY: report submission

ifneq ($(filter submission,$(MAKECMDGOALS)),)
ifeq ($(strip $(NAME)),)
$(error usage: make submission NAME=lastname)
endif
endif

# -g: always rebuild, as a figure that appears in results/ is no dependency latexmk knows of yet.
report: $(STAMP)
	$(PY) report/make_numbers.py
	cd report && latexmk -g -pdf -interaction=nonstopmode -halt-on-error report.tex

# make_submission.py regenerates the numbers and builds its own copy of the report with the name
# (report/report.pdf keeps the neutral author), or packs the committed PDF where LaTeX is missing.
submission: $(STAMP)
	@$(PY) report/make_submission.py --name "$(NAME)"
