import json
import uuid

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_POST

from analytics.tasks import track_event

from .forms import SignupForm
from .models import WelcomeEmail
from .tasks import send_welcome_email


def create_user(form):
    """Save a valid signup form and enqueue its tasks once the transaction commits.

    Returns None, with a form error, if a concurrent signup took the username or email.
    """
    try:
        with transaction.atomic():
            user = form.save()
            # The email owed, in the same transaction: if publishing fails below, the
            # resend_pending_welcome_emails beat task sends it later.
            WelcomeEmail.objects.create(email=user.email)
            event_id = str(uuid.uuid4())
            # robust: if the broker is unreachable, log it rather than fail a signup that is already saved.
            # (Lambdas, not functools.partial: Django's error log needs the callback's __qualname__.)
            transaction.on_commit(lambda: send_welcome_email.delay(user.email), robust=True)
            transaction.on_commit(lambda: track_event.delay(event_id, "signup", {"user_id": user.pk}), robust=True)
    except IntegrityError:
        form.add_error(
            None, ValidationError("A user with that username or email address already exists.", code="unique")
        )
        return None
    return user


@require_http_methods(["GET", "POST"])
def signup(request):
    if request.method == "GET":
        return render(request, "users/signup.html", {"form": SignupForm()})
    form = SignupForm(request.POST)
    if form.is_valid() and (user := create_user(form)):
        messages.success(request, f"Welcome, {user.username}! A welcome email is on its way to {user.email}.")
        return redirect("signup-done")
    return render(request, "users/signup.html", {"form": form}, status=400)


# No CSRF token: the endpoint uses no cookies and only accepts application/json,
# which a cross-site page cannot send without a CORS preflight that we never allow.
@csrf_exempt
@require_POST
def api_signup(request):
    if request.content_type != "application/json":
        return JsonResponse(
            {"errors": {"__all__": ["Send a JSON body with Content-Type: application/json."]}}, status=415
        )
    try:
        data = json.loads(request.body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return JsonResponse({"errors": {"__all__": ["The body must be a JSON object."]}}, status=400)
    form = SignupForm(data)
    if form.is_valid() and (user := create_user(form)):
        return JsonResponse({"id": user.pk, "username": user.username, "email": user.email}, status=201)
    return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
