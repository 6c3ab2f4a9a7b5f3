from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from .models import User, WelcomeEmail

admin.site.register(User, UserAdmin)


@admin.register(WelcomeEmail)
class WelcomeEmailAdmin(admin.ModelAdmin):
    list_display = ["email", "sent_at"]
    search_fields = ["email"]
