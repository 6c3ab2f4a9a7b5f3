from django.urls import path
from django.views.generic import TemplateView

from . import views

urlpatterns = [
    path("signup/", views.signup, name="signup"),
    path("signup/done/", TemplateView.as_view(template_name="users/signup_done.html"), name="signup-done"),
    path("api/signup/", views.api_signup, name="api-signup"),
]
