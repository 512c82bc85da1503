"""The console: a browser UI for admin keys, served by the gateway at ``/console``.

``sessions`` keeps sign-ins (an HttpOnly, SameSite=Strict cookie; CSRF token per session),
``router`` serves the page, the sign-in and the few read models the admin APIs lack (overview,
sampled traffic), and ``static/`` holds the page itself: plain HTML, CSS and JavaScript, no
build step, no CDN, plots drawn as SVG by the page's own code.
"""
