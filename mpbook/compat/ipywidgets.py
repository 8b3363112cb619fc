"""What mpbook's tests read of ipywidgets beyond its public API (checked against 8.1).

- the CSS classes a widget carries: ``DOMWidget._dom_classes``, the synced trait that
  ``add_class`` / ``remove_class`` change (ipywidgets has no public getter). The browser test
  finds the dashboard's parts by these classes; the dashboard tests read them here.
"""

from __future__ import annotations

CHECKED = "8.1"


def css_classes(widget) -> tuple[str, ...]:
    """The CSS classes ``add_class`` gave ``widget``."""
    return tuple(widget._dom_classes)


def verify() -> None:
    """Raise with a clear message if this ipywidgets lacks what the adapter uses."""
    import ipywidgets

    problems = []
    try:
        label = ipywidgets.HTML()
        label.add_class("mpbook-check")
        if css_classes(label) != ("mpbook-check",):
            problems.append(f"add_class('mpbook-check') left the classes {css_classes(label)}")
        if "_dom_classes" not in label.get_state():
            problems.append("_dom_classes is no longer synced to the browser")
    except AttributeError as exc:
        problems.append(f"DOMWidget._dom_classes is gone ({exc})")
    if problems:
        raise RuntimeError(
            f"mpbook.compat.ipywidgets was checked against ipywidgets {CHECKED}; "
            f"ipywidgets {ipywidgets.__version__} differs: {'; '.join(problems)}"
        )
