"""The URLconf tests/e2e/django_site.py's middleware gives a request with `x-tenant`."""

from django.urls import path

from tests.e2e.django_site import ok

urlpatterns = [path("shop/<slug:name>/", ok)]
