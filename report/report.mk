# The report and the hand-in; included by the main Makefile, which defines PY and STAMP.
#   make report                    report/report.pdf from results/ (missing numbers print as ??)
#   make submission NAME=lastname  lastname_assignment3.zip: report.pdf and the code
# Needs pdflatex and latexmk (Debian: texlive-latex-base texlive-latex-recommended
# texlive-fonts-recommended texlive-latex-extra latexmk).

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

submission: report
	$(PY) report/make_submission.py --name "$(NAME)"
